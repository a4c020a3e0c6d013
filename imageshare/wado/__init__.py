"""WADO-URI (PS3.18 chapter 9): request parsing (:mod:`.query`) and rendering (:mod:`.render`)."""
