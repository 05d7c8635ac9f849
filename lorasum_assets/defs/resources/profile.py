"""The run's profile, as a resource: picked per run in the Launchpad, ``LORASUM_PROFILE`` by default."""


import dagster as dg
from pydantic import Field

from lorasum_assets.settings.profiles import PROFILES, Profile, get_profile


class ProfileResource(dg.ConfigurableResource):
    """Every setting a run leaves unset comes from its profile."""

    name: str = Field(description=f"The run's profile: one of {', '.join(sorted(PROFILES))}.")

    def get(self) -> Profile:
        return get_profile(self.name)
