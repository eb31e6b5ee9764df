"""Reading the build host: kernel module trees and .modinfo, firmware, ELF library closures, where
a kernel's files are, and host-only detection of what the dump target needs.
"""
