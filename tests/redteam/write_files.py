# Attack: change what later gradings import or read: append a no-op check to the grader's check
# files, rewrite the checks package, drop a .pth file into site-packages, plant ./torch/__init__.py
# beside the notebook (and in every folder above it), and leave files in /tmp and $HOME.
import os
import site
import sys
from pathlib import Path
import torch
import minisd.course.checks as checks

targets = list(Path(checks.__file__).parent.glob("ch*.py")) + [Path(checks.__file__)]
for path in targets:
    try:
        with open(path, "a") as file:
            file.write("\ndef check_classifier_free_guidance(ctx):\n    pass\n")
    except OSError:
        pass
for folder in site.getsitepackages() + [p for p in sys.path if p]:
    try:
        Path(folder, "zz_redteam.pth").write_text("import os; os.environ['REDTEAM'] = '1'\n")
    except OSError:
        pass
here = Path.cwd()
for folder in [here, *here.parents, Path("/tmp"), Path.home()]:
    try:
        (folder / "torch").mkdir(exist_ok=True)
        (folder / "torch" / "__init__.py").write_text("allclose = lambda *a, **k: True\n")
    except OSError:
        pass

# %%
def classifier_free_guidance(eps_uncond, eps_cond, scale):
    return torch.zeros_like(eps_cond)
