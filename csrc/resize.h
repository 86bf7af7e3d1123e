/* Image/grid resizing with PyTorch F.interpolate semantics, channels-last layout
 * (element (y, x, c) at (y*W + x)*C + c). */
#ifndef VAD_RESIZE_H
#define VAD_RESIZE_H

#include <stddef.h>

/* mode='bilinear', align_corners=False, antialias=False. */
void vad_resize_bilinear(float *out, const float *in, int C, int Hin, int Win, int Hout, int Wout);

/* Single-channel variant that adds the resized map into out. */
void vad_resize_bilinear_add(float *out, const float *in, int Hin, int Win, int Hout, int Wout);

/* Backward of vad_resize_bilinear for one channel: din [Hin, Win] = the adjoint of the resize
 * applied to dout [Hout, Wout] (written). Its weights come from the same coefficient function as
 * the forward, so the two cannot disagree. scratch: vad_resize_bilinear_backward_bytes(...). */
size_t vad_resize_bilinear_backward_bytes(int Hin, int Win, int Hout, int Wout);
void vad_resize_bilinear_backward(float *din, const float *dout, int Hin, int Win, int Hout, int Wout,
                                  void *scratch);

#endif
