#!/usr/bin/env python3
"""Fits the polynomial of include/limoe/math/plain.hpp's plain_erfc and prints its coefficients.

g(a) = exp(a^2) erfc(a) on [0, inf), mapped by t = (a - K) / (a + K) onto [-1, 1) (K = 3.75, after
Schonfelder, Math. Comp. 32, 1978), is expanded in Chebyshev polynomials of t at 50 digits (interpolation at
120 Chebyshev nodes), cut where the terms fall below 2e-18, and rewritten in powers of t for Horner's rule.
Prints the coefficients from the constant term up, and the two numbers that justify the cut and the rewrite:
the largest term left out, and the sum of the power coefficients' magnitudes (near 1: no cancellation).

Needs mpmath (Debian: python3-mpmath). Not run by the build: its output is in plain.hpp.
"""
import mpmath as mp

mp.mp.dps = 50
K = mp.mpf("3.75")
NODES = 120
CUT = mp.mpf("2e-18")


def g(t):
    if t == 1:
        return mp.mpf(0)
    a = K * (1 + t) / (1 - t)
    return mp.exp(a * a) * mp.erfc(a)


def chebyshev():
    nodes = [mp.cos(mp.pi * (j + mp.mpf(1) / 2) / NODES) for j in range(NODES)]
    values = [g(t) for t in nodes]
    c = [2 * mp.fsum(values[j] * mp.cos(mp.pi * k * (j + mp.mpf(1) / 2) / NODES) for j in range(NODES)) / NODES
         for k in range(NODES)]
    c[0] /= 2
    return c


def powers(c):
    T = [[mp.mpf(1)], [mp.mpf(0), mp.mpf(1)]]
    for k in range(2, len(c)):
        a = [mp.mpf(0)] + [2 * x for x in T[k - 1]]
        b = T[k - 2] + [mp.mpf(0)] * (len(a) - len(T[k - 2]))
        T.append([x - y for x, y in zip(a, b)])
    p = [mp.mpf(0)] * len(c)
    for k, ck in enumerate(c):
        for j, v in enumerate(T[k]):
            p[j] += ck * v
    return p


def main():
    c = chebyshev()
    n = max(i for i in range(len(c)) if abs(c[i]) > CUT) + 1
    p = powers(c[:n])
    print(f"// degree {n - 1}; largest term left out {mp.nstr(max(abs(x) for x in c[n:]), 3)}; "
          f"sum of |power coefficients| {mp.nstr(mp.fsum(abs(x) for x in p), 6)}")
    for x in p:
        print(repr(float(x)))


if __name__ == "__main__":
    main()
