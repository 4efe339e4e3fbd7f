"""The VM test tier's host side: build a Debian image, boot it on scenarios, read their results back.

`prepare.py` builds what a boot needs (`image.py` the base image, `wheels.py` the guest's
wheels, `rootdisk.py` the disk with uoomd installed), `payload.py` packs the scenarios a boot
runs, `boot.py` runs one boot; `scenarios/` is what runs inside the guest (stdlib Python, run
by the guest's own python3), `guest/` is installed into the image.
"""
