"""Charts (PNG) for people who would rather look than read.

matplotlib is imported only while drawing: it is not in the Lambda layer.
"""
