# bash completion for swarmfs
# Install: cp contrib/swarmfs.bash /usr/share/bash-completion/completions/swarmfs
#      or: source contrib/swarmfs.bash   (in ~/.bashrc)

_swarmfs_mountpoints() {
    # Mounted swarmfs filesystems (type fuse.swarmfs), for umount.
    local source target fstype rest
    while read -r source target fstype rest; do
        [[ $fstype == fuse.swarmfs ]] && printf '%b\n' "$target"
    done </proc/mounts 2>/dev/null
}

_swarmfs() {
    local cur prev words cword
    _init_completion 2>/dev/null || {
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    }

    local commands="init mount node umount status invite join fsck trash demo"
    local common="--data-dir -v --verbose -q --quiet -h --help"
    local node_options="--listen --bootstrap --swarm-key-file --replicas --cache-size -o"

    local command="" i
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
        --data-dir | --listen | --bootstrap | --swarm-key-file | --replicas | --cache-size | -o | --wait)
            ((i++)) ;;
        -*) ;;
        *) command=${words[i]}; break ;;
        esac
    done

    case $prev in
    --data-dir)
        COMPREPLY=($(compgen -d -- "$cur")); return ;;
    --swarm-key-file)
        COMPREPLY=($(compgen -f -- "$cur")); return ;;
    --replicas)
        COMPREPLY=($(compgen -W "1 2 3 all" -- "$cur")); return ;;
    -o)
        local done_part=${cur%,*} last=${cur##*,}
        local options="allow_other default_permissions ro noatime nosuid nodev"
        if [[ $cur == *,* ]]; then
            COMPREPLY=($(compgen -P "$done_part," -W "$options" -- "$last"))
        else
            COMPREPLY=($(compgen -W "$options" -- "$cur"))
        fi
        return ;;
    --listen | --bootstrap | --cache-size | --wait)
        return ;;  # free-form values
    esac

    if [[ -z $command ]]; then
        COMPREPLY=($(compgen -W "$commands --version -h --help" -- "$cur"))
        return
    fi

    local options
    case $command in
    init) options="--swarm-key-file" ;;
    mount) options="$node_options --foreground" ;;
    node) options="$node_options" ;;
    umount) options="--wait" ;;
    status) options="--json --watch" ;;
    fsck) options="--repair" ;;
    demo) options="--exit" ;;
    *) options="" ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$options $common" -- "$cur"))
        return
    fi

    # Positional arguments: count the ones after the command.
    local positionals=0
    for ((i = i + 1; i < cword; i++)); do
        case ${words[i]} in
        --data-dir | --listen | --bootstrap | --swarm-key-file | --replicas | --cache-size | -o | --wait)
            ((i++)) ;;
        -*) ;;
        *) ((positionals++)) ;;
        esac
    done
    case $command:$positionals in
    mount:0) COMPREPLY=($(compgen -d -- "$cur")) ;;
    umount:0)
        local IFS=$'\n'
        COMPREPLY=($(compgen -W "$(_swarmfs_mountpoints)" -- "$cur"))
        [[ ${#COMPREPLY[@]} -gt 0 ]] || COMPREPLY=($(compgen -d -- "$cur"))
        ;;
    trash:0) COMPREPLY=($(compgen -W "list restore" -- "$cur")) ;;
    trash:1) [[ $prev == restore ]] && COMPREPLY=($(compgen -f -- "$cur")) ;;
    esac
}

complete -F _swarmfs swarmfs
