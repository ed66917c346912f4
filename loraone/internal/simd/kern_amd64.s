#include "textflag.h"

// func mul8x16(a *float32, lda int, x *float32, ldx int, n int, y *float32, ldy int)
//
// y[r][0:16] = Σ_k a[r·lda+k]·x[k·ldx+0:16] for r < 8 (lda, ldx, ldy in
// elements, n >= 1).
TEXT ·mul8x16(SB), NOSPLIT, $0-56
	MOVQ a+0(FP), SI
	MOVQ lda+8(FP), R8
	SHLQ $2, R8
	MOVQ x+16(FP), DI
	MOVQ ldx+24(FP), R9
	SHLQ $2, R9
	MOVQ n+32(FP), CX
	MOVQ y+40(FP), DX
	MOVQ ldy+48(FP), R10
	SHLQ $2, R10
	LEAQ (R8)(R8*2), R12 // 3·lda
	LEAQ (SI)(R8*4), BX  // row 4
	VXORPS Z0, Z0, Z0
	VXORPS Z1, Z1, Z1
	VXORPS Z2, Z2, Z2
	VXORPS Z3, Z3, Z3
	VXORPS Z4, Z4, Z4
	VXORPS Z5, Z5, Z5
	VXORPS Z6, Z6, Z6
	VXORPS Z7, Z7, Z7

loop:
	VMOVUPS (DI), Z8
	VFMADD231PS.BCST (SI), Z8, Z0
	VFMADD231PS.BCST (SI)(R8*1), Z8, Z1
	VFMADD231PS.BCST (SI)(R8*2), Z8, Z2
	VFMADD231PS.BCST (SI)(R12*1), Z8, Z3
	VFMADD231PS.BCST (BX), Z8, Z4
	VFMADD231PS.BCST (BX)(R8*1), Z8, Z5
	VFMADD231PS.BCST (BX)(R8*2), Z8, Z6
	VFMADD231PS.BCST (BX)(R12*1), Z8, Z7
	ADDQ $4, SI
	ADDQ $4, BX
	ADDQ R9, DI
	DECQ CX
	JNZ  loop

	LEAQ (R10)(R10*2), R12
	LEAQ (DX)(R10*4), BX
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, (DX)(R10*1)
	VMOVUPS Z2, (DX)(R10*2)
	VMOVUPS Z3, (DX)(R12*1)
	VMOVUPS Z4, (BX)
	VMOVUPS Z5, (BX)(R10*1)
	VMOVUPS Z6, (BX)(R10*2)
	VMOVUPS Z7, (BX)(R12*1)
	VZEROUPPER
	RET

// func mul1x16(a *float32, x *float32, ldx int, n int, y *float32)
//
// y[0:16] = Σ_k a[k]·x[k·ldx+0:16] (n >= 1).
TEXT ·mul1x16(SB), NOSPLIT, $0-40
	MOVQ a+0(FP), SI
	MOVQ x+8(FP), DI
	MOVQ ldx+16(FP), R9
	SHLQ $2, R9
	MOVQ n+24(FP), CX
	MOVQ y+32(FP), DX
	VXORPS Z0, Z0, Z0

loop1:
	VMOVUPS (DI), Z8
	VFMADD231PS.BCST (SI), Z8, Z0
	ADDQ $4, SI
	ADDQ R9, DI
	DECQ CX
	JNZ  loop1

	VMOVUPS Z0, (DX)
	VZEROUPPER
	RET

// func mulT8x16(a *float32, lda int, y *float32, ldy int, n int, z *float32, ldz int)
//
// z[k][0:16] += Σ_{r<8} a[r·lda+k]·y[r·ldy+0:16] for k < n (n >= 1).
TEXT ·mulT8x16(SB), NOSPLIT, $0-56
	MOVQ a+0(FP), SI
	MOVQ lda+8(FP), R8
	SHLQ $2, R8
	MOVQ y+16(FP), DI
	MOVQ ldy+24(FP), R9
	SHLQ $2, R9
	MOVQ n+32(FP), CX
	MOVQ z+40(FP), DX
	MOVQ ldz+48(FP), R10
	SHLQ $2, R10
	LEAQ (R9)(R9*2), R12
	LEAQ (DI)(R9*4), BX
	VMOVUPS (DI), Z16
	VMOVUPS (DI)(R9*1), Z17
	VMOVUPS (DI)(R9*2), Z18
	VMOVUPS (DI)(R12*1), Z19
	VMOVUPS (BX), Z20
	VMOVUPS (BX)(R9*1), Z21
	VMOVUPS (BX)(R9*2), Z22
	VMOVUPS (BX)(R12*1), Z23
	LEAQ (R8)(R8*2), R12 // 3·lda
	LEAQ (SI)(R8*4), BX  // row 4

loopT:
	VMOVUPS (DX), Z0
	VMULPS.BCST (BX), Z20, Z1
	VFMADD231PS.BCST (SI), Z16, Z0
	VFMADD231PS.BCST (BX)(R8*1), Z21, Z1
	VFMADD231PS.BCST (SI)(R8*1), Z17, Z0
	VFMADD231PS.BCST (BX)(R8*2), Z22, Z1
	VFMADD231PS.BCST (SI)(R8*2), Z18, Z0
	VFMADD231PS.BCST (BX)(R12*1), Z23, Z1
	VFMADD231PS.BCST (SI)(R12*1), Z19, Z0
	VADDPS Z1, Z0, Z0
	VMOVUPS Z0, (DX)
	ADDQ $4, SI
	ADDQ $4, BX
	ADDQ R10, DX
	DECQ CX
	JNZ  loopT
	VZEROUPPER
	RET

// func mulT1x16(a *float32, y *float32, n int, z *float32, ldz int)
//
// z[k][0:16] += a[k]·y[0:16] for k < n (n >= 1).
TEXT ·mulT1x16(SB), NOSPLIT, $0-40
	MOVQ a+0(FP), SI
	MOVQ y+8(FP), DI
	MOVQ n+16(FP), CX
	MOVQ z+24(FP), DX
	MOVQ ldz+32(FP), R10
	SHLQ $2, R10
	VMOVUPS (DI), Z16

loopT1:
	VMOVUPS (DX), Z0
	VFMADD231PS.BCST (SI), Z16, Z0
	VMOVUPS Z0, (DX)
	ADDQ $4, SI
	ADDQ R10, DX
	DECQ CX
	JNZ  loopT1
	VZEROUPPER
	RET

// func cvtHalf(dst *float32, src *uint16, n int)
//
// dst[i] = float32(half src[i]) for i < n, n a positive multiple of 16
// (VCVTPH2PS: exact; a signaling NaN comes back quiet).
TEXT ·cvtHalf(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $4, CX

loopH:
	VCVTPH2PS (SI), Z0
	VMOVUPS   Z0, (DI)
	ADDQ      $32, SI
	ADDQ      $64, DI
	DECQ      CX
	JNZ       loopH
	VZEROUPPER
	RET

// func cvtBFloat16(dst *float32, src *uint16, n int)
//
// dst[i] = float32 with the bits src[i]<<16, n a positive multiple of 16.
TEXT ·cvtBFloat16(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	SHRQ $4, CX

loopB:
	VPMOVZXWD (SI), Z0
	VPSLLD    $16, Z0, Z0
	VMOVDQU32 Z0, (DI)
	ADDQ      $32, SI
	ADDQ      $64, DI
	DECQ      CX
	JNZ       loopB
	VZEROUPPER
	RET

// func dmul8x8(a *float64, lda int, x *float64, ldx int, n int, y *float64, ldy int, sub int)
//
// s[r][0:8] = Σ_k a[r·lda+k]·x[k·ldx+0:8] for r < 8 (lda, ldx, ldy in
// elements, n >= 1); y[r][0:8] = s[r] when sub == 0, y[r][0:8] −= s[r]
// otherwise.
TEXT ·dmul8x8(SB), NOSPLIT, $0-64
	MOVQ a+0(FP), SI
	MOVQ lda+8(FP), R8
	SHLQ $3, R8
	MOVQ x+16(FP), DI
	MOVQ ldx+24(FP), R9
	SHLQ $3, R9
	MOVQ n+32(FP), CX
	MOVQ y+40(FP), DX
	MOVQ ldy+48(FP), R10
	SHLQ $3, R10
	MOVQ sub+56(FP), R11
	LEAQ (R8)(R8*2), R12 // 3·lda
	LEAQ (SI)(R8*4), BX  // row 4
	VXORPD Z0, Z0, Z0
	VXORPD Z1, Z1, Z1
	VXORPD Z2, Z2, Z2
	VXORPD Z3, Z3, Z3
	VXORPD Z4, Z4, Z4
	VXORPD Z5, Z5, Z5
	VXORPD Z6, Z6, Z6
	VXORPD Z7, Z7, Z7

dloop:
	VMOVUPD (DI), Z8
	VFMADD231PD.BCST (SI), Z8, Z0
	VFMADD231PD.BCST (SI)(R8*1), Z8, Z1
	VFMADD231PD.BCST (SI)(R8*2), Z8, Z2
	VFMADD231PD.BCST (SI)(R12*1), Z8, Z3
	VFMADD231PD.BCST (BX), Z8, Z4
	VFMADD231PD.BCST (BX)(R8*1), Z8, Z5
	VFMADD231PD.BCST (BX)(R8*2), Z8, Z6
	VFMADD231PD.BCST (BX)(R12*1), Z8, Z7
	ADDQ $8, SI
	ADDQ $8, BX
	ADDQ R9, DI
	DECQ CX
	JNZ  dloop

	LEAQ  (R10)(R10*2), R12
	LEAQ  (DX)(R10*4), BX
	TESTQ R11, R11
	JZ    dstore
	VMOVUPD (DX), Z8
	VSUBPD  Z0, Z8, Z0
	VMOVUPD (DX)(R10*1), Z8
	VSUBPD  Z1, Z8, Z1
	VMOVUPD (DX)(R10*2), Z8
	VSUBPD  Z2, Z8, Z2
	VMOVUPD (DX)(R12*1), Z8
	VSUBPD  Z3, Z8, Z3
	VMOVUPD (BX), Z8
	VSUBPD  Z4, Z8, Z4
	VMOVUPD (BX)(R10*1), Z8
	VSUBPD  Z5, Z8, Z5
	VMOVUPD (BX)(R10*2), Z8
	VSUBPD  Z6, Z8, Z6
	VMOVUPD (BX)(R12*1), Z8
	VSUBPD  Z7, Z8, Z7

dstore:
	VMOVUPD Z0, (DX)
	VMOVUPD Z1, (DX)(R10*1)
	VMOVUPD Z2, (DX)(R10*2)
	VMOVUPD Z3, (DX)(R12*1)
	VMOVUPD Z4, (BX)
	VMOVUPD Z5, (BX)(R10*1)
	VMOVUPD Z6, (BX)(R10*2)
	VMOVUPD Z7, (BX)(R12*1)
	VZEROUPPER
	RET

// func dmul1x8(a *float64, x *float64, ldx int, n int, y *float64, sub int)
//
// dmul8x8 for one row.
TEXT ·dmul1x8(SB), NOSPLIT, $0-48
	MOVQ a+0(FP), SI
	MOVQ x+8(FP), DI
	MOVQ ldx+16(FP), R9
	SHLQ $3, R9
	MOVQ n+24(FP), CX
	MOVQ y+32(FP), DX
	MOVQ sub+40(FP), R11
	VXORPD Z0, Z0, Z0

dloop1:
	VMOVUPD (DI), Z8
	VFMADD231PD.BCST (SI), Z8, Z0
	ADDQ $8, SI
	ADDQ R9, DI
	DECQ CX
	JNZ  dloop1

	TESTQ R11, R11
	JZ    dstore1
	VMOVUPD (DX), Z8
	VSUBPD  Z0, Z8, Z0

dstore1:
	VMOVUPD Z0, (DX)
	VZEROUPPER
	RET

// func dmulT8x8(a *float64, lda int, y *float64, ldy int, n int, z *float64, ldz int)
//
// z[k][0:8] += Σ_{r<8} a[r·lda+k]·y[r·ldy+0:8] for k < n (n >= 1).
TEXT ·dmulT8x8(SB), NOSPLIT, $0-56
	MOVQ a+0(FP), SI
	MOVQ lda+8(FP), R8
	SHLQ $3, R8
	MOVQ y+16(FP), DI
	MOVQ ldy+24(FP), R9
	SHLQ $3, R9
	MOVQ n+32(FP), CX
	MOVQ z+40(FP), DX
	MOVQ ldz+48(FP), R10
	SHLQ $3, R10
	LEAQ (R9)(R9*2), R12
	LEAQ (DI)(R9*4), BX
	VMOVUPD (DI), Z16
	VMOVUPD (DI)(R9*1), Z17
	VMOVUPD (DI)(R9*2), Z18
	VMOVUPD (DI)(R12*1), Z19
	VMOVUPD (BX), Z20
	VMOVUPD (BX)(R9*1), Z21
	VMOVUPD (BX)(R9*2), Z22
	VMOVUPD (BX)(R12*1), Z23
	LEAQ (R8)(R8*2), R12 // 3·lda
	LEAQ (SI)(R8*4), BX  // row 4

dloopT:
	VMOVUPD (DX), Z0
	VMULPD.BCST (BX), Z20, Z1
	VFMADD231PD.BCST (SI), Z16, Z0
	VFMADD231PD.BCST (BX)(R8*1), Z21, Z1
	VFMADD231PD.BCST (SI)(R8*1), Z17, Z0
	VFMADD231PD.BCST (BX)(R8*2), Z22, Z1
	VFMADD231PD.BCST (SI)(R8*2), Z18, Z0
	VFMADD231PD.BCST (BX)(R12*1), Z23, Z1
	VFMADD231PD.BCST (SI)(R12*1), Z19, Z0
	VADDPD Z1, Z0, Z0
	VMOVUPD Z0, (DX)
	ADDQ $8, SI
	ADDQ $8, BX
	ADDQ R10, DX
	DECQ CX
	JNZ  dloopT
	VZEROUPPER
	RET

// func dmulT1x8(a *float64, y *float64, n int, z *float64, ldz int)
//
// z[k][0:8] += a[k]·y[0:8] for k < n (n >= 1).
TEXT ·dmulT1x8(SB), NOSPLIT, $0-40
	MOVQ a+0(FP), SI
	MOVQ y+8(FP), DI
	MOVQ n+16(FP), CX
	MOVQ z+24(FP), DX
	MOVQ ldz+32(FP), R10
	SHLQ $3, R10
	VMOVUPD (DI), Z16

dloopT1:
	VMOVUPD (DX), Z0
	VFMADD231PD.BCST (SI), Z16, Z0
	VMOVUPD Z0, (DX)
	ADDQ $8, SI
	ADDQ R10, DX
	DECQ CX
	JNZ  dloopT1
	VZEROUPPER
	RET
