"""shmflow's operator library: concrete operators implementing runtime.task's protocol."""
