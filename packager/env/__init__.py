"""Conda environments built for a *target* server: solve, install, pip layer, lock, inspect, pack.

Modules by job: ``solve`` (py-rattler against the target's virtual packages), ``install`` (py-rattler install,
running the env's tools), ``pip`` (the pip layer, vLLM kernels), ``facts`` (lock entries, checks, CUDA and vLLM
detection), ``build`` (the whole build and its reuse stamp: ``build_env``, ``inspect_env``), ``compiler`` (the
C compiler a CUDA environment carries: its conda specs and where it is), ``elf`` (the ELF scan), ``pack``
(``envs/<env>.tar.zst``, with ``tarstream`` and ``placeholder``), ``runtime`` (the installer runtime
``runtime/<env>.tar.gz``).


- **Solve for the target, not the build host.** The conda part is solved with py-rattler against the
  target's virtual packages, passed explicitly: ``__cuda`` = the environment's ``cuda:`` (absent for a
  CPU-only env), ``__glibc`` = ``target.glibc``, ``__linux`` (kernel ``LINUX_VERSION``, RHEL 8's, assumed),
  ``__unix`` and ``__archspec``. A GPU-less build host thus resolves exactly what the server can run. When
  no solution exists, the error names the package and the virtual package it needs
  ("llmtest-kernels 1.0 (cu124_0) needs __cuda >=12.4; manifest targets 12.2").
- **Install** into ``<work>/<name>/prefix`` with py-rattler; the package cache ``<work>/pkgs`` must be kept:
  conda-pack reads each package's ``info/paths.json`` from it (prefix placeholders).
- **pip layer** with the environment's own pip (``index_url``/``extra_index_urls``/``find_links``/``no_index``
  from the manifest; the build host's pip configuration applies too), ``--report`` to record each wheel's
  sha256; then ``pip uninstall`` of ``pip.remove``; then ``vllm download-kernels`` where the installed vLLM
  has that command. Note: pip picks wheels for the *build host*; the ELF scan below catches a wheel that
  needs a newer glibc than the target has.
- **Lock and facts**: conda (name, version, build, url, sha256) and pip (name, version, sha256 of the wheel;
  for an existing env the sha256 of the distribution's RECORD, marked ``"hash_of": "RECORD"``), the Python
  version, the CUDA runtime really inside (torch's ``version.cuda``, else the ``cuda-cudart``/``cuda-version``
  conda package, else ``nvidia-cuda-runtime-cu1x``), the vLLM version and how to start it, the sonames the
  env's ELF files need but do not ship (glibc's own excluded) and the glibc floor (newest ``GLIBC_x.y``
  symbol version any ELF file needs).
- The ``prefix:`` form inspects an environment built by hand instead (same facts, same checks).

Known traps are turned into clear errors: pip removing or replacing files of a conda package (conda-pack
cannot pack such an env), editable installs (their code lives outside the env), a glibc floor above the
target's, a CUDA runtime newer than the manifest's ``cuda:``.
"""

