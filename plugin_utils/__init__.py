"""The stages behind main.py: params -> rules -> data -> launch -> worker -> host."""
