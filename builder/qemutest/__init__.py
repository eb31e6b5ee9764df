"""The QEMU test harness behind `qemu-test`: guests, test servers (sshd, NFS), faults and traffic
checks. Not shipped by `make install` or the wheel; the CLI imports it only for `qemu-test`.
"""
