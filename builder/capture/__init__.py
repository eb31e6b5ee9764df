"""Capture-stage code run inside the kdump initramfs: imports only os, struct, sys, time, errno."""
