"""Start a ComfyUI checkout's main.py with the checkout's own packages: python comfyui_launcher.py ROOT ARGS..."""

import os
import runpy
import sys

from comfyui_checkout import bind_checkout_packages  # run as a script: its own folder is on sys.path

if __name__ == "__main__":
    checkout = os.path.abspath(sys.argv[1])
    sys.argv = [os.path.join(checkout, "main.py"), *sys.argv[2:]]
    os.chdir(checkout)
    bind_checkout_packages(checkout)
    runpy.run_path(os.path.join(checkout, "main.py"), run_name="__main__")
