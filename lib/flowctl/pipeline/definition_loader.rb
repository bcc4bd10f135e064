# frozen_string_literal: true

require "did_you_mean"

module Flowctl
  module Pipeline
    class Definition
      # Turns a YamlTree into a Definition, collecting every problem (with its line and
      # component) instead of stopping at the first; raises DefinitionError at the end.
      # @api private
      class Loader
        ENV_NAME = /\A[A-Za-z_][A-Za-z0-9_]*\z/
        ID = /\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\z/

        def initialize(text, file, check_commands, env)
          @text = text
          @file = file.to_s
          @check_commands = check_commands
          @env = env
          @problems = []
          @warnings = []
        end

        def load
          root = parse_tree
          definition = build(root) if root
          raise DefinitionError, @problems.sort_by.with_index { |pr, i| [pr.line || 0, i] } unless @problems.empty?

          definition
        end

        private

        def parse_tree
          doc = YamlTree.parse(@text, file: @file)
          return doc.root if doc.root&.kind == :map

          problem(doc.root&.line || 1, nil, doc.root ? "the file must hold a mapping (apiVersion, kind, metadata, spec)" : "the file is empty")
          nil
        rescue YamlTree::Error => e
          problem(e.line || 1, nil, e.message)
          nil
        end

        def problem(line, component, message)
          @problems << DefinitionError::Problem.new(@file, line, component, message)
          nil
        end

        def warn_at(line, component, message)
          @warnings << DefinitionError::Problem.new(@file, line, component, message).to_s
        end

        def build(root)
          check_keys(root, TOP_KEYS, nil)
          check_header(root)
          name = metadata_name(root)
          spec = root["spec"]
          return problem(root.line, nil, "spec: missing (sources, processors, sinks)") if spec.nil?
          return problem(spec.line, "spec", "must be a mapping") unless spec.kind == :map

          @spec_line = root.key_node("spec").line
          assemble(spec, name)
        end

        def check_header(root)
          api = root["apiVersion"]
          if api.nil? then problem(root.line, nil, "apiVersion: missing (flowctl/v1)")
          elsif !(api.kind == :scalar && api.text == "flowctl/v1")
            problem(api.line, nil, "apiVersion: #{describe(api)} is not supported (flowctl/v1)")
          end
          kind = root["kind"]
          if kind.nil? then problem(root.line, nil, "kind: missing (Pipeline)")
          elsif !(kind.kind == :scalar && kind.text == "Pipeline")
            problem(kind.line, nil, "kind: #{describe(kind)} is not supported (Pipeline)")
          end
        end

        def metadata_name(root)
          meta = root["metadata"]
          return problem(root.line, nil, "metadata: missing (metadata.name)") || "pipeline" if meta.nil?
          return problem(meta.line, "metadata", "must be a mapping") || "pipeline" unless meta.kind == :map

          check_keys(meta, METADATA_KEYS, "metadata")
          %w[labels annotations].each { |k| string_map(meta[k], "metadata", k) if meta[k] }
          string(meta["name"], "metadata", "name", required: true, line: meta.line) || "pipeline"
        end

        def assemble(spec, name)
          check_keys(spec, SPEC_KEYS, "spec")
          check_driver(spec)
          problem(spec["pipelines"].line, "spec", "pipelines: nested pipelines are not supported by flowctl-pipeline") if spec["pipelines"]
          opts = spec_options(spec)
          components = read_components(spec, opts)
          return nil if components.nil?

          dead = dead_letter(spec, components)
          if dead && opts[:wiring] == "discovery"
            problem(spec["dead_letter"].line, "spec", "dead_letter: needs wiring: runner (components that wire themselves handle their failed events)")
          end
          wire_defaults(components, dead)
          check_graph(components)
          check_event_types(components)
          Definition.new(file: @file, name: name, components: components.each(&:freeze), dead_letter: dead,
                         warnings: @warnings, text: @text, **opts)
        end

        def check_driver(spec)
          driver = spec["driver"]
          return if driver.nil? || (driver.kind == :scalar && driver.text == "process")

          problem(driver.line, "spec", "driver: #{describe(driver)} is not supported; flowctl-pipeline runs driver: process")
        end

        def spec_options(spec)
          { shutdown_grace: duration(spec["shutdown_grace"], "spec", "shutdown_grace") || 10.0,
            heartbeat_interval: duration(spec["heartbeat_interval"], "spec", "heartbeat_interval") || 10.0,
            queue_size: integer(spec["queue_size"], "spec", "queue_size", 1..1_000_000) || 256,
            ready_timeout: duration(spec["ready_timeout"], "spec", "ready_timeout") || 30.0,
            wiring: wiring(spec["wiring"]) }
        end

        def wiring(node)
          value = string(node, "spec", "wiring")
          return "runner" if value.nil?
          return value if WIRINGS.include?(value)

          problem(node.line, "spec", "wiring: #{value.inspect} is not one of #{WIRINGS.join(', ')}#{suggest(value, WIRINGS)}") || "runner"
        end

        # --- components -------------------------------------------------------------

        def read_components(spec, opts)
          seen = {}
          components = []
          ROLES.each do |section, role|
            list = spec[section]
            next if list.nil? || list.null?
            next problem(list.line, "spec", "#{section}: must be a list of components") unless list.kind == :seq

            list.items.each_with_index do |node, i|
              c = component(node, role, "#{section}[#{i}]", components.size, opts)
              next unless c

              if (first = seen[c.id])
                problem(c.line, c.label, "id #{c.id.inspect} is already used by the #{first.role} at line #{first.line}")
              else
                seen[c.id] = c
                components << c
              end
            end
          end
          problem(@spec_line, "spec", "no sources: a pipeline needs at least one source") if components.none?(&:source?)
          components
        end

        def component(node, role, where, index, opts)
          return problem(node.line, where, "must be a mapping (id, command, ...)") unless node.kind == :map

          id = string(node["id"], where, "id", required: true, line: node.line)
          if id && !ID.match?(id)
            problem(node["id"].line, where, "id #{id.inspect} must be 1-128 letters, digits, '.', '_' or '-'")
            id = nil
          end
          label = id ? "#{role} #{id.inspect}" : where
          check_keys(node, COMPONENT_KEYS, label)
          ignored(node, label)
          cfg = config(node, label)
          Component.new(id: id || where, role: role, index: index, line: node.line,
                        argv: argv(node, label), env: environment(node, label, cfg), config: cfg,
                        inputs: inputs(node, role, label), inputs_given: !node["inputs"].nil?,
                        input_event_types: string_list(node["input_event_types"], label, "input_event_types"),
                        output_event_types: string_list(node["output_event_types"], label, "output_event_types"),
                        health_port: integer(node["health_port"], label, "health_port", 1..65_535),
                        restart: restart(node, label),
                        ready_timeout: duration(node["ready_timeout"], label, "ready_timeout") || opts[:ready_timeout],
                        dead_letter: false)
        end

        def ignored(node, label)
          IGNORED_KEYS.each do |k|
            warn_at(node[k].line, label, "#{k}: ignored by the process driver") if node[k]
          end
          replicas = integer(node["replicas"], label, "replicas", 0..1_000)
          problem(node["replicas"].line, label, "replicas: #{replicas} is not supported by the process driver (1)") if replicas && replicas > 1
        end

        # command: [argv...] (or one word), then args; checked against PATH / the file system.
        def argv(node, label)
          cmd = node["command"]
          if cmd.nil? || cmd.null?
            why = node["image"] ? "image: needs a container driver; give command: for driver process" : "command: missing"
            return problem(node.line, label, why) || []
          end
          words = cmd.kind == :scalar ? scalar_command(cmd, label) : string_list(cmd, label, "command")
          return [] if words.nil?
          return problem(cmd.line, label, "command: is empty") || [] if words.empty?

          check_command(words[0], cmd, label, node)
          words + string_list(node["args"], label, "args")
        end

        def scalar_command(cmd, label)
          word = string(cmd, label, "command")
          return nil if word.nil?
          if word.match?(/\s/)
            problem(cmd.line, label, "command: #{word.inspect} holds spaces: give a list ([program, arg, ...])")
            return nil
          end
          [word]
        end

        def check_command(program, cmd, label, node)
          return unless @check_commands

          return problem(cmd.line, label, "command: #{program.inspect} holds a NUL byte") if program.include?("\0")

          if program.include?("/")
            path = File.expand_path(program)
            if !File.exist?(path) then problem(cmd.line, label, "command: #{program} not found")
            elsif File.directory?(path) then problem(cmd.line, label, "command: #{program} is a directory")
            elsif !File.executable?(path) then problem(cmd.line, label, "command: #{program} is not executable")
            end
          elsif !in_path?(program, node)
            problem(cmd.line, label, "command: #{program.inspect} not found in PATH")
          end
        end

        def in_path?(program, node)
          env = node["env"]
          path = (env&.kind == :map && env["PATH"]&.kind == :scalar ? env["PATH"].text : nil) || @env["PATH"].to_s
          path.split(File::PATH_SEPARATOR).any? do |dir|
            file = File.join(dir.empty? ? "." : dir, program)
            File.file?(file) && File.executable?(file)
          end
        end

        # config: keys become UPPER_SNAKE variables; env: wins.
        def environment(node, label, values)
          env = {}
          cfg = node["config"]
          if cfg&.kind == :map
            cfg.pairs.each do |k, v|
              name = env_name(k.text)
              next problem(k.line, label, "config: key #{k.text.inspect} does not make an environment variable name") unless ENV_NAME.match?(name)
              next unless values.key?(k.text)

              env[name] = v.kind == :scalar ? (v.null? ? "" : v.text) : JSON.generate(values[k.text])
            end
          end
          env.merge!(string_map(node["env"], label, "env", env_names: true))
          env
        end

        def env_name(key)
          key.gsub(/([a-z\d])([A-Z])/, '\1_\2').gsub(/[^A-Za-z0-9_]+/, "_").upcase
        end

        def config(node, label)
          cfg = node["config"]
          return {} if cfg.nil? || cfg.null?
          return problem(cfg.line, label, "config: must be a mapping") || {} unless cfg.kind == :map

          cfg.to_ruby
        rescue YamlTree::Error => e
          problem(cfg.line, label, "config: #{e.message}") || {}
        end

        def inputs(node, role, label)
          list = node["inputs"]
          return [] if list.nil?

          problem(list.line, label, "inputs: a source reads from no other component") if role == :source
          ids = string_list(list, label, "inputs")
          dups = ids.tally.select { |_, n| n > 1 }.keys
          problem(list.line, label, "inputs: #{dups.map(&:inspect).join(', ')} given twice") unless dups.empty?
          ids.uniq
        end

        def restart(node, label)
          policy = node["restart_policy"]
          hash = node["restart"]
          values = DEFAULT_RESTART.to_h
          values[:policy] = restart_policy(policy, label, "restart_policy") if policy
          if hash && hash.kind != :map
            problem(hash.line, label, "restart: must be a mapping (#{RESTART_KEYS.join(', ')})")
          elsif hash
            restart_hash(hash, label, values)
          end
          RestartPolicy.new(**values).freeze
        end

        def restart_hash(hash, label, values)
          check_keys(hash, RESTART_KEYS, label, prefix: "restart.")
          values[:policy] = restart_policy(hash["policy"], label, "restart.policy") if hash["policy"]
          if (max = hash["max_restarts"])
            values[:max_restarts] = max.null? ? nil : integer(max, label, "restart.max_restarts", 0..1_000_000)
          end
          values[:backoff] = duration(hash["backoff"], label, "restart.backoff") || values[:backoff]
          values[:max_backoff] = duration(hash["max_backoff"], label, "restart.max_backoff") || values[:max_backoff]
          return unless values[:max_backoff] < values[:backoff]

          problem(hash.line, label, "restart: max_backoff (#{values[:max_backoff]}s) is less than backoff (#{values[:backoff]}s)")
        end

        def restart_policy(node, label, key)
          value = string(node, label, key)
          return value if value.nil? || RESTART_POLICIES.include?(value)

          problem(node.line, label, "#{key}: #{value.inspect} is not one of #{RESTART_POLICIES.join(', ')}") || "on-failure"
        end

        # --- wiring ---------------------------------------------------------------

        def dead_letter(spec, components)
          node = spec["dead_letter"]
          return nil if node.nil?

          id = string(node, "spec", "dead_letter")
          return nil if id.nil?

          c = components.find { |x| x.id == id }
          return problem(node.line, "spec", "dead_letter: no component #{id.inspect}#{suggest(id, components.map(&:id))}") unless c
          return problem(node.line, "spec", "dead_letter: #{c.label} is not a sink") unless c.sink?

          problem(c.line, c.label, "the dead-letter sink takes no inputs: (it receives failed events)") if c.inputs_given
          c.dead_letter = true
          c.inputs = []
          id
        end

        # flowctl's chain where inputs: is not given: a processor reads from the one
        # before it (the first from every source), a sink from the last processor (or
        # from every source when there is none).
        def wire_defaults(components, dead)
          sources = components.select(&:source?).map(&:id)
          previous = sources
          components.select(&:processor?).each do |p|
            p.inputs = previous unless p.inputs_given
            previous = [p.id]
          end
          components.select(&:sink?).each do |s|
            s.inputs = previous unless s.inputs_given || s.id == dead
          end
        end

        def check_graph(components)
          by_id = components.to_h { |c| [c.id, c] }
          components.each do |c|
            c.inputs.each do |input|
              up = by_id[input]
              if up.nil?
                problem(input_line(c), c.label, "inputs: no component #{input.inspect}#{suggest(input, by_id.keys)}")
              elsif up.sink?
                problem(input_line(c), c.label, "inputs: #{up.label} is a sink and produces no events")
              elsif up.id == c.id
                problem(input_line(c), c.label, "inputs: reads from itself")
              end
            end
          end
          components.each { |c| problem(c.line, c.label, "no component reads from it and it is not a sink") if orphan?(c, components) }
          check_cycles(components, by_id)
        end

        def orphan?(component, components)
          !component.sink? && components.none? { |x| x.inputs.include?(component.id) }
        end

        def input_line(component) = @input_lines&.dig(component.id) || component.line

        def check_cycles(components, by_id)
          state = {}
          components.each { |c| visit(c, by_id, state, []) }
        end

        def visit(component, by_id, state, path)
          return if state[component.id] == :done
          if state[component.id] == :open
            cycle = path[path.index(component.id)..] + [component.id]
            return problem(input_line(component), component.label,
                           "inputs: cycle #{cycle.join(' -> ')} (each reads from the next)")
          end

          state[component.id] = :open
          component.inputs.each do |input|
            up = by_id[input]
            visit(up, by_id, state, path + [component.id]) if up && up.id != component.id
          end
          state[component.id] = :done
        end

        def check_event_types(components)
          by_id = components.to_h { |c| [c.id, c] }
          components.each do |c|
            next if c.input_event_types.empty?

            c.inputs.each do |input|
              up = by_id[input]
              next if up.nil? || up.output_event_types.empty? || (up.output_event_types & c.input_event_types).any?

              warn_at(c.line, c.label, "none of #{up.label}'s output_event_types #{up.output_event_types} is among its input_event_types #{c.input_event_types}")
            end
          end
        end

        # --- values -----------------------------------------------------------------

        def check_keys(map, known, label, prefix: "")
          map.pairs.each do |k, _|
            next if known.include?(k.text)

            problem(k.line, label, "unknown key #{(prefix + k.text).inspect}#{suggest(k.text, known)}")
          end
          remember_input_line(map, label) if known.equal?(COMPONENT_KEYS)
        end

        def remember_input_line(map, _label)
          id = map["id"]
          inputs = map["inputs"]
          return unless id&.kind == :scalar && inputs

          (@input_lines ||= {})[id.text] = inputs.line
        end

        def suggest(word, dictionary)
          best = DidYouMean::SpellChecker.new(dictionary: dictionary).correct(word).first
          best ? " (did you mean #{best.inspect}?)" : ""
        end

        def describe(node)
          node.kind == :scalar ? node.text.inspect : "a #{node.kind == :map ? 'mapping' : 'list'}"
        end

        def string(node, label, key, required: false, line: nil)
          if node.nil? || node.null?
            problem(node&.line || line, label, "#{key}: missing") if required
            return nil
          end
          return node.text if node.kind == :scalar && !node.text.empty?

          problem(node.line, label, node.kind == :scalar ? "#{key}: must not be empty" : "#{key}: must be a string (given #{describe(node)})")
        end

        def string_list(node, label, key)
          return [] if node.nil? || node.null?
          return problem(node.line, label, "#{key}: must be a list of strings (given #{describe(node)})") || [] unless node.kind == :seq

          node.items.filter_map { |item| string(item, label, "#{key} item", required: true) }
        end

        def string_map(node, label, key, env_names: false)
          return {} if node.nil? || node.null?
          return problem(node.line, label, "#{key}: must be a mapping (given #{describe(node)})") || {} unless node.kind == :map

          node.pairs.each_with_object({}) do |(k, v), out|
            if env_names && !ENV_NAME.match?(k.text)
              problem(k.line, label, "#{key}: #{k.text.inspect} is not an environment variable name")
            elsif v.kind != :scalar
              problem(v.line, label, "#{key}.#{k.text}: must be a string (given #{describe(v)})")
            elsif env_names && v.text.include?("\0")
              problem(v.line, label, "#{key}.#{k.text}: holds a NUL byte")
            else
              out[k.text] = v.null? ? "" : v.text
            end
          end
        end

        def integer(node, label, key, range)
          return nil if node.nil? || node.null?

          value = node.kind == :scalar ? node.value : nil
          return problem(node.line, label, "#{key}: must be an integer (given #{describe(node)})") unless value.is_a?(Integer)
          return problem(node.line, label, "#{key}: #{value} is out of range #{range}") unless range.cover?(value)

          value
        end

        def duration(node, label, key)
          return nil if node.nil? || node.null?
          return problem(node.line, label, "#{key}: must be a duration (given #{describe(node)})") unless node.kind == :scalar

          value = node.value.is_a?(Numeric) ? node.value : node.text
          Flowctl::Heartbeat.parse_interval(value, name: key)
        rescue ArgumentError, TypeError, RangeError, FloatDomainError => e
          problem(node.line, label, e.message)
        end
      end
    end
  end
end
