/* The kernel for float and for double, for the instruction set ISA (vectors of VECTOR_BYTES);
 * included by _windows.c once per instruction set, inside that instruction set's target pragma.
 * _windows_kernel.h undefines the type parameters defined here before each inclusion. */

#define NAME(x) CAT(CAT(x, SUFFIX), ISA)

#define SCALAR float
#define INTEGER int32_t
#define SUFFIX f
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define ROUND_MAGIC_BITS 0x4B400000
#define EXPONENT_BIAS 127
#define MANTISSA_BITS 23
#define EXP2_DEGREE 6
#include "_windows_kernel.h"

#define SCALAR double
#define INTEGER int64_t
#define SUFFIX d
#define ROUND_MAGIC 6755399441055744.0 /* 1.5 * 2^52 */
#define ROUND_MAGIC_BITS 0x4338000000000000LL
#define EXPONENT_BIAS 1023
#define MANTISSA_BITS 52
#define EXP2_DEGREE 13
#include "_windows_kernel.h"

#undef NAME
#undef ISA
#undef VECTOR_BYTES
