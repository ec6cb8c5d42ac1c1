import os

# before anything imports torch: spinning OpenMP threads make a shared CPU 10x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
