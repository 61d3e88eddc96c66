"""Generated from protos/weightshare/v1 by `make proto`; do not edit."""
