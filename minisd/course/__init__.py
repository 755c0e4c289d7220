"""The course around minisd: notebook helpers, the generated student chapters, and the autograder.

    from minisd.course import cmp, show_images       # in notebooks
    python -m minisd.course build [--check]          # notebooks/ -> chapters/ (students' versions)
    python -m minisd.course grade chapters/01_attention/assignment.ipynb
    python -m minisd.course execute [NOTEBOOK ...]   # re-run notebooks in place, saving outputs

Importing this package stays cheap (no nbclient/matplotlib): the build/grade machinery lives in
submodules.
"""

from .helpers import cmp, max_diff, repo_root, show_images, show_maps

__all__ = ["cmp", "max_diff", "repo_root", "show_images", "show_maps"]
