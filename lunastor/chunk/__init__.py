"""lunastor.chunk"""
