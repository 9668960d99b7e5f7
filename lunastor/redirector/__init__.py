"""lunastor.redirector"""
