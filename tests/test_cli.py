"""The command line: every command's parser builds and answers --help; no command or an unknown one exits 2."""

from __future__ import annotations

import pytest

from embscale.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"embscale {command}" in capsys.readouterr().out


def test_no_or_unknown_command_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["plant"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert sorted(build_parser()._subparsers._group_actions[0].choices) == sorted(COMMANDS)
