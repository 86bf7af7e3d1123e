/* Integer status codes with a retrievable, thread-local message. */
#ifndef VAD_ERRORS_H
#define VAD_ERRORS_H

enum vad_status {
    VAD_OK = 0,
    VAD_ERR_VALUE = 1,  /* bad argument: shapes, sizes, configuration */
    VAD_ERR_MEMORY = 2, /* allocation failed */
};

/* printf-style; stores the message and returns `code` so callers can `return vad_fail(...)`. */
int vad_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *vad_last_error(void);

#endif
