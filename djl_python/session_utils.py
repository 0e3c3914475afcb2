"""Find a request's session from SageMaker's session header (DJL's `djl_python.session_utils`)."""

from __future__ import annotations

from djl_python.session_manager import Session, SessionManager
from handlers.djl_api import Input

HEADER_SAGEMAKER_SESSION_ID = "X-Amzn-SageMaker-Session-Id"


def get_session(session_manager: SessionManager | None, request: Input) -> Session | None:
    """The session the request's `X-Amzn-SageMaker-Session-Id` names, or None without the header.

    A session header sent to a model without a session manager is an error rather than silently
    stateless, so a client never believes its conversation state is kept when it is not.
    """
    session_id = request.get_property(HEADER_SAGEMAKER_SESSION_ID)
    if session_manager is None:
        if session_id is not None:
            raise RuntimeError(
                f"invalid payload: stateful sessions are not enabled, {HEADER_SAGEMAKER_SESSION_ID} "
                "header not supported"
            )
        return None
    if session_id is None:
        return None
    return session_manager.get_session(session_id)
