"""How the bench runs tcprc: installed as the README installs it, or from the checkout.

"venv" (the default, "as deployed"): a venv of its own, as README "Installing on
a gateway" makes /opt/tcprc, with the `tcprc` command pip writes.  A venv does
not read the base interpreter's site-packages, so whatever that holds (on a
build machine: an editable-install finder, a .pth that imports certifi at every
start) costs the device nothing, as on a gateway.  The venv is made without pip
and without network: the checkout is put on its path by a .pth file holding
only the path (a plain path line imports nothing), and tomli (Python < 3.11)
by a link to the base interpreter's installed tomli package.

"pythonpath" (the way of earlier runs, for comparison): the base interpreter,
with its own site-packages, the checkout on PYTHONPATH, `python -m tcprc`.

Either way the modules are byte-compiled first, at the optimisation level the
environment asks for (PYTHONOPTIMIZE), as the documented install does.
"""

import os
import subprocess
from typing import Dict, List, Optional

INSTALLS = ("venv", "pythonpath")

# What pip writes for a console_scripts entry point (setup.cfg: tcprc = tcprc.cli:main).
CONSOLE_SCRIPT = """#!%s
# -*- coding: utf-8 -*-
import re
import sys
from tcprc.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


class InstallError(Exception):
    """The venv could not be made: why, in one line."""


def _run(argv: List[str], env: Optional[Dict[str, str]] = None) -> str:
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          cwd="/", timeout=120)
    if done.returncode != 0:
        raise InstallError("%s: %s" % (" ".join(argv[:3]), done.stderr.decode().strip()[-200:]))
    return done.stdout.decode().strip()


def make_venv(python: str, repo: str, where: str) -> str:
    """A venv in `where` with `repo`'s tcprc importable; the path of its `tcprc` command."""
    _run([python, "-m", "venv", "--without-pip", where])
    venv_python = os.path.join(where, "bin", "python")
    site = _run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(site, "tcprc-checkout.pth"), "w") as f:
        f.write(repo + "\n")
    has_tomllib = _run([venv_python, "-c", "import sys; print(sys.version_info >= (3, 11))"]) == "True"
    if not has_tomllib:
        # Found by the base interpreter (its site-packages, where pip put it); only
        # that package is linked in, not the directory with its .pth files.
        tomli = _run([python, "-c", "import importlib.util, os; "
                      "print(os.path.dirname(importlib.util.find_spec('tomli').origin))"])
        os.symlink(tomli, os.path.join(site, "tomli"))
    command = os.path.join(where, "bin", "tcprc")
    with open(command, "w") as f:
        f.write(CONSOLE_SCRIPT % venv_python)
    os.chmod(command, 0o755)
    return command


def compile_modules(python: str, dirs: List[str], env: Dict[str, str]) -> bool:
    """Byte-compile `dirs` at the environment's optimisation level (PYTHONOPTIMIZE=2:
    .opt-2.pyc), as the documented install does; False if that failed."""
    dirs = [os.path.realpath(d) for d in dirs]   # compileall does not follow a linked directory
    done = subprocess.run([python, "-m", "compileall", "-q"] + dirs, env=env, cwd="/",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return done.returncode == 0


DEPLOY_ENV = ("PYTHONOPTIMIZE", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")


def describe(install: str, env: Dict[str, str]) -> str:
    """One line for the report: how tcprc ran."""
    how = "a venv of its own, its tcprc command" if install == "venv" else \
        "the checkout on PYTHONPATH, python -m tcprc"
    return "tcprc from %s; %s" % (how, " ".join("%s=%s" % (k, env[k]) if env.get(k) else "no " + k
                                                for k in DEPLOY_ENV))
