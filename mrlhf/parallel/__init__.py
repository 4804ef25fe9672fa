"""Process groups, rank arithmetic, collectives and microbatch schedules."""
