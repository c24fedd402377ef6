"""The dashboard at ``/ui/``: pages, sign-in and actions (:mod:`service.ui.app`)."""
