/* The exp2 polynomial's coefficients, shared by the compiled kernels (_windows.c, _clusters.c). */

#ifndef PATCHDB_EXP2_H
#define PATCHDB_EXP2_H

/* (ln 2)^k / k!: the Taylor coefficients of 2^f = e^(f ln 2) */
static const double EXP2_TAYLOR[] = {
    1.0, 0.6931471805599453, 0.2402265069591007, 0.055504108664821576, 0.009618129107628477, 0.0013333558146428441,
    0.00015403530393381606, 1.5252733804059838e-05, 1.3215486790144305e-06, 1.0178086009239696e-07,
    7.054911620801121e-09, 4.44553827187081e-10, 2.5678435993488196e-11, 1.3691488853904124e-12};

#endif
