"""Background work on a chunk server: the repair loop and its pure planner (`repair`,
`repair_plan`), scrub, failed data directories (`datadirs`) and deleting garbage-collected
replicas (`collector`)."""
