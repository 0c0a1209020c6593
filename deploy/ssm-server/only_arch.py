"""Keep one CUDA architecture in mamba-ssm's and causal-conv1d's setup.py (the host GPU's).

Their setup.py append a `-gencode arch=compute_XX,code=sm_XX` pair per architecture; this
drops every pair but ARCH's, so the kernels compile once.  Fails if ARCH's pair is absent.
Usage: python only_arch.py 90 path/to/setup.py ...
"""

import re
import sys

arch, paths = sys.argv[1], sys.argv[2:]
pair = re.compile(r'cc_flag\.append\("-gencode"\)\n(\s*)cc_flag\.append\("arch=compute_(\d+a?),code=sm_\d+a?"\)')
for path in paths:
    text = open(path).read()
    kept = [m.group(2) for m in pair.finditer(text) if m.group(2) == arch]
    if not kept:
        sys.exit(f"{path}: no -gencode pair for compute_{arch}; choose one of "
                 f"{sorted({m.group(2) for m in pair.finditer(text)})}")
    new = pair.sub(lambda m: m.group(0) if m.group(2) == arch else f"pass\n{m.group(1)}pass", text)
    open(path, "w").write(new)
    print(f"{path}: kept sm_{arch} of {len(pair.findall(text))} architectures")
