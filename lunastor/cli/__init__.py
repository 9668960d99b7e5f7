"""lunastor.cli"""
