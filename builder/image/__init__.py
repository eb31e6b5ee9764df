"""Building an image: from the config and what the host holds to a plan of every path, written as
one compressed cpio archive; and reading an image back.
"""
