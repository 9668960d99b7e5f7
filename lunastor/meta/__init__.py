"""lunastor.meta"""
