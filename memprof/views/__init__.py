"""What people read: terminal tables, progress, the comparison and plan views, plots and the HTML report. Enters:
Records, comparisons, plans. Leaves: text, images and pages; views format, they never compute measurements."""
