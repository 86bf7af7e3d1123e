/* Exact ranking metrics for anomaly detection (no binning).
 *
 * - vad_binary_metrics: ROC AUC, average precision and F1-max with scikit-learn semantics (one
 *   threshold per distinct score, ties grouped).
 * - vad_aupro: the MVTec AD AUPRO (8-connected ground-truth regions, every distinct score is a
 *   threshold, PRO integrated over FPR in [0, fpr_limit] and divided by fpr_limit).
 * - vad_aupro_anomalyclip: the AUPRO that AnomalyCLIP-family papers report (given thresholds,
 *   FPR filter, min-max rescaled FPR axis).
 *
 * Scores/maps are float32 (scores_f64 = 0) or float64 (scores_f64 = 1) and must be finite; labels
 * and masks are uint8 holding 0 (normal) or 1 (anomalous). Maps and masks are (n_images, height,
 * width), C-contiguous. Exactness comes from sorting order-preserving integer keys of the scores
 * (parallel LSD radix sort); memory is linear in the number of points, never thresholds x pixels.
 *
 * Each call is independent (no global state); pool may be NULL (single-threaded). Returns VAD_OK,
 * VAD_ERR_VALUE (bad input, undefined metric) or VAD_ERR_MEMORY, with a message (vad_last_error). */
#ifndef VAD_METRICS_H
#define VAD_METRICS_H

#include <stdint.h>

#include "threadpool.h"

typedef struct {
    double auroc;  /* sklearn.metrics.roc_auc_score */
    double ap;     /* sklearn.metrics.average_precision_score */
    double f1_max; /* max of 2PR/(P+R) over the precision-recall curve points (P=R=0 skipped) */
} vad_binary_result;

/* Needs both classes present; at most 2^32 points. Memory: 2 keys per point (8 bytes for float32
 * scores, 16 for float64). */
int vad_binary_metrics(const uint8_t *labels, const void *scores, int scores_f64, int64_t n,
                       vad_binary_result *out, vad_pool *pool);

/* MVTec AD AUPRO; fpr_limit in (0, 1]. Needs at least one defect pixel and one normal pixel.
 * Only pixels scoring at or above (about) the threshold where FPR reaches fpr_limit are sorted.
 * Memory: 2 keys (8 bytes for float32 maps, 16 for float64) per such pixel, 8 more bytes per such
 * defect pixel, plus 16 bytes per pixel of one image per thread. */
int vad_aupro(const uint8_t *masks, const void *maps, int maps_f64, int64_t n_images, int64_t height,
              int64_t width, double fpr_limit, double *out, vad_pool *pool);

/* AnomalyCLIP-family AUPRO over the given ascending thresholds: a pixel is positive at threshold t
 * when score > t (compared in double). For each threshold, PRO = mean over all regions of the
 * region's positive fraction and FPR = positive normal pixels / normal pixels; thresholds with
 * FPR < fpr_below are kept, their FPRs min-max rescaled to [0, 1], and PRO integrated over them by
 * the trapezoid rule (area taken positive, as sklearn.metrics.auc does). *out is NaN when fewer
 * than two thresholds are kept or all kept FPRs are equal. */
int vad_aupro_anomalyclip(const uint8_t *masks, const void *maps, int maps_f64, int64_t n_images,
                          int64_t height, int64_t width, const double *thresholds, int64_t n_thresholds,
                          double fpr_below, double *out, vad_pool *pool);

#endif
