/* Image/grid resizing with PyTorch F.interpolate semantics, channels-last layout
 * (element (y, x, c) at (y*W + x)*C + c). */
#ifndef VAD_RESIZE_H
#define VAD_RESIZE_H

/* mode='bilinear', align_corners=False, antialias=False. */
void vad_resize_bilinear(float *out, const float *in, int C, int Hin, int Win, int Hout, int Wout);

/* Single-channel variant that adds the resized map into out. */
void vad_resize_bilinear_add(float *out, const float *in, int Hin, int Win, int Hout, int Wout);

#endif
