"""Capture-stage code run inside the kdump initramfs: it imports only os, struct, sys, time
and hashlib."""
