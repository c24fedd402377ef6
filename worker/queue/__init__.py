"""The Celery side: the app and its beat schedule, the tasks (each a few lines over the
engine), and what makes delivery at-least-once (leases, redelivery of a dead worker's work).
"""
