/* The exp2 polynomial's coefficients, shared by the compiled kernels (_windows.c, _clusters.c). */

#ifndef PATCHDB_EXP2_H
#define PATCHDB_EXP2_H

/* (ln 2)^k / k!: the Taylor coefficients of 2^f = e^(f ln 2) */
static const double EXP2_TAYLOR[] = {
    1.0, 0.6931471805599453, 0.2402265069591007, 0.055504108664821576, 0.009618129107628477, 0.0013333558146428441,
    0.00015403530393381606, 1.5252733804059838e-05, 1.3215486790144305e-06, 1.0178086009239696e-07,
    7.054911620801121e-09, 4.44553827187081e-10, 2.5678435993488196e-11, 1.3691488853904124e-12};

/* Defines `static inline VEC NAME(VEC t)`: 2^t in every lane of t, for t up to a few bits above 0; exactly 0 where
 * t < FLOOR (also for -inf and NaN). VEC is a GCC vector of SCALAR (float or double, of MANTISSA_BITS, EXPONENT_BIAS)
 * and IVEC one of INTEGER of the same width. t is rounded to the nearest integer n with the magic number ROUND_MAGIC
 * (1.5 * 2^MANTISSA_BITS, whose bits are ROUND_MAGIC_BITS); 2^(t - n) is the Taylor polynomial of degree DEGREE of
 * e^((t - n) ln 2) on [-1/2, 1/2] (relative error below 2e-7 at degree 6 for float, 1e-17 at 13 for double), and 2^n
 * is made from its exponent bits: for float, (n + 127) * 2^23 is an integer that a float holds exactly, and
 * converting it gives them without integer arithmetic, which AVX lacks at this width. */
#define DEFINE_EXP2(NAME, VEC, IVEC, SCALAR, INTEGER, FLOOR, DEGREE, MANTISSA_BITS, EXPONENT_BIAS, ROUND_MAGIC,        \
                    ROUND_MAGIC_BITS)                                                                                \
    static inline __attribute__((always_inline)) VEC NAME(VEC t) {                                                   \
        IVEC kept = t >= (SCALAR)(FLOOR);                                                                            \
        VEC shifted = t + (SCALAR)(ROUND_MAGIC);                                                                     \
        VEC whole = shifted - (SCALAR)(ROUND_MAGIC);                                                                 \
        VEC fraction = t - whole;                                                                                    \
        VEC power = (VEC){0} + (SCALAR)EXP2_TAYLOR[DEGREE];                                                          \
        for (int k = (DEGREE) - 1; k >= 0; k--) power = power * fraction + (SCALAR)EXP2_TAYLOR[k];                   \
        IVEC scale = (MANTISSA_BITS) == 23                                                                           \
            ? __builtin_convertvector((whole + (SCALAR)(EXPONENT_BIAS)) * (SCALAR)(1LL << (MANTISSA_BITS)), IVEC)    \
            : ((IVEC)shifted - (INTEGER)(ROUND_MAGIC_BITS) + (INTEGER)(EXPONENT_BIAS)) << (MANTISSA_BITS);           \
        return (VEC)((IVEC)(power * (VEC)scale) & kept);                                                             \
    }

#endif
