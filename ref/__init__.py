"""The two papers' core (Internal Guidance, InnerControl): imports nothing outside ref/."""
