"""Native CPU kernels, compiled from C source with the system compiler at first use.

`gemv`: y = x @ W^T (+ bias) for 1..16 rows of x, reading W once (decode-time linear layers). Use as
`from ernie45.kernels import gemv; gemv.supports(x, w) and gemv.gemv(x, w)`.
"""
