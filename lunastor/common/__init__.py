"""lunastor.common"""
