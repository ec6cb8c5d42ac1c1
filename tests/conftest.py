import os

# before anything imports torch: tests run servers, workers and clients side by side on few cores,
# where spinning OpenMP threads make everything several times slower (see server/cpu_env.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
