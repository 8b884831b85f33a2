import os, time
x = int(os.environ["SLURM_ARRAY_TASK_ID"])
time.sleep(0.01)
with open(os.path.join('/work/wt-slurm/shoal-bench-slurm-rsirxrw9/bare', f"r{x}.tmp"), "w") as f:
    f.write(str(x * x))
os.replace(os.path.join('/work/wt-slurm/shoal-bench-slurm-rsirxrw9/bare', f"r{x}.tmp"), os.path.join('/work/wt-slurm/shoal-bench-slurm-rsirxrw9/bare', f"r{x}"))
