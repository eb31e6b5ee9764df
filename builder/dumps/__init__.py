"""After the reboot: listing saved dumps and recovering a dump written onto a raw device."""
