#include "posembed.h"

#include <string.h>

#include "errors.h"
#include "resize.h"
#include "vit.h"

int vad_resize_positions(float *out, const float *in, int D, int G0, int g, int mode) {
    if (g == G0) {
        memcpy(out, in, (size_t)G0 * G0 * D * sizeof(float));
        return VAD_OK;
    }
    switch (mode) {
    case VAD_POS_BILINEAR:
        vad_resize_bilinear(out, in, D, G0, G0, g, g);
        return VAD_OK;
    default:
        return vad_fail(VAD_ERR_VALUE, "position resize mode %d is not supported yet", mode);
    }
}
