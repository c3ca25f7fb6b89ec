"""`customdiff ui`: a local web app to teach, watch, sample, merge and download concepts in the browser.

A small FastAPI server (app.py) with one background training worker (jobs.py), files kept under one work
folder (workdir.py), and a static HTML/JS page (static/). Needs the `ui` extra: pip install "customdiff[ui]".
"""
