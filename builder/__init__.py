"""kdump-mkinitrd: build and load kdump capture initramfs images."""

__version__ = "0.1.0"
