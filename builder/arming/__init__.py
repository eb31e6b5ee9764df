"""Arming this host: the capture kernel's command line, loading it with kexec, registration and
status, and ssh-setup.
"""
