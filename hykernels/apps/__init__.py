"""Applications built on the kernel library, behind ``python -m hykernels``: ``demo`` (demo.py,
its embedded traces in demo_data.py), ``experiment`` (the ablation) and ``train`` (HyTuning from
files). They use only the library's public API; the library never imports them
(tests/test_layout.py holds that), and nothing here is needed to call a kernel.
"""
