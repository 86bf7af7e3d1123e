/* Resizing the patch-position table [G0*G0, D] to a g x g grid, per backbone family. */
#ifndef VAD_POSEMBED_H
#define VAD_POSEMBED_H

/* out: [g*g, D]; in: [G0*G0, D] (row-major grid, channels last). mode: enum vad_pos_resize;
 * cubic_a: the cubic coefficient of VAD_POS_BICUBIC_SIZE. Returns VAD_OK or an error code. */
int vad_resize_positions(float *out, const float *in, int D, int G0, int g, int mode, float cubic_a);

#endif
