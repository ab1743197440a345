"""Run a shell command line and print its output (gproc's ``ShellExec`` example).

Run with ``python examples/shell_exec.py``; after three seconds it prints
``hello gf!``.
"""

import mproc

if __name__ == "__main__":
    print(mproc.shell_exec('sleep 3; echo "hello gf!"'))
