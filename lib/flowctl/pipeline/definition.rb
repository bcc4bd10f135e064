# frozen_string_literal: true

require "json"
require_relative "yaml_tree"

module Flowctl
  module Pipeline
    # A pipeline file that cannot run. #problems lists every problem found, each with the
    # file, the line and the component; the message has one line per problem:
    #
    #   pipeline.yaml:14: processor "enrich": unknown key "inptus" (did you mean "inputs"?)
    #   pipeline.yaml:22: sink "out": inputs: no component "enrichr" (did you mean "enrich"?)
    class DefinitionError < Flowctl::Error
      # component: the label ("processor \"enrich\"", "processors[1]") or nil
      Problem = Struct.new(:file, :line, :component, :message) do
        def to_s
          [file, line].compact.join(":") + ": " + (component ? "#{component}: " : "") + message
        end
      end

      attr_reader :problems

      def initialize(problems)
        @problems = problems.freeze
        super(problems.map(&:to_s).join("\n"))
      end
    end

    # A pipeline in flowctl's YAML format (FLOWCTL_V1.md, "How flowctl run runs components"),
    # checked completely before anything starts. Read with Psych's node API so that every
    # problem names the file, the line and the component.
    #
    #   defn = Flowctl::Pipeline::Definition.load("pipeline.yaml")
    #   defn.components.map(&:id)   # sources, then processors, then sinks
    #   defn.upstream("enrich")     # => ["gen"]
    #
    # flowctl's keys (apiVersion flowctl/v1, kind Pipeline, metadata.name, spec.driver
    # process, sources/processors/sinks with id, command, args, env, config, inputs,
    # input_event_types, output_event_types, health_port, restart_policy, ...) plus this
    # gem's extensions, documented in docs/pipeline.md: per component `restart:`
    # {policy, max_restarts, backoff, max_backoff} and `ready_timeout:`; in spec
    # `dead_letter:` (the id of a sink that receives failed events), `shutdown_grace:`,
    # `heartbeat_interval:`, `queue_size:`, `ready_timeout:`.
    class Definition
      ROLES = { "sources" => :source, "processors" => :processor, "sinks" => :sink }.freeze

      TOP_KEYS = %w[apiVersion kind metadata spec].freeze
      METADATA_KEYS = %w[name namespace labels annotations].freeze
      SPEC_KEYS = %w[description driver sources processors sinks config pipelines
                     dead_letter shutdown_grace heartbeat_interval queue_size ready_timeout wiring].freeze
      # Who moves the events: the runner (its Router, through the components' endpoints) or
      # the components themselves, each finding its inputs through DiscoverComponents.
      WIRINGS = %w[runner discovery].freeze
      COMPONENT_KEYS = %w[id type image command args inputs input_event_types output_event_types config env
                          volumes secrets ports health_check health_port replicas resources depends_on
                          restart_policy restart ready_timeout].freeze
      # flowctl's keys for container drivers: accepted, ignored by the process driver (a warning).
      IGNORED_KEYS = %w[volumes secrets ports resources health_check depends_on type].freeze
      RESTART_KEYS = %w[policy max_restarts backoff max_backoff].freeze
      RESTART_POLICIES = %w[always on-failure never].freeze

      # How a crashed component is restarted: policy "always" (also after a clean exit
      # while the pipeline runs), "on-failure" (default) or "never"; at most max_restarts
      # times (nil: no limit), waiting backoff seconds, doubled each time up to max_backoff.
      RestartPolicy = Struct.new(:policy, :max_restarts, :backoff, :max_backoff, keyword_init: true) do
        def restart?(clean_exit) = policy == "always" || (policy == "on-failure" && !clean_exit)
        def delay(attempt) = [backoff * (2**[attempt, 30].min), max_backoff].min
      end
      DEFAULT_RESTART = RestartPolicy.new(policy: "on-failure", max_restarts: 5, backoff: 0.5, max_backoff: 30.0).freeze

      # One component of the pipeline. role: :source, :processor or :sink; index: its
      # place in start order (sources, processors, sinks; 0-based); argv: command + args;
      # env: what the YAML gives (config keys as UPPER_SNAKE, env: wins); inputs: the ids
      # it reads from (given or the default chain); line: where it is defined.
      Component = Struct.new(:id, :role, :index, :line, :argv, :env, :config, :inputs, :inputs_given,
                             :input_event_types, :output_event_types, :health_port, :restart, :ready_timeout,
                             :dead_letter, keyword_init: true) do
        def label = "#{role} #{id.inspect}"
        def source? = role == :source
        def processor? = role == :processor
        def sink? = role == :sink
        # Does an event of this type go to this component? (no input types: every type)
        def accepts?(type) = input_event_types.empty? || input_event_types.include?(type)
      end

      attr_reader :file, :name, :components, :dead_letter, :shutdown_grace, :heartbeat_interval, :queue_size,
                  :ready_timeout, :wiring, :warnings, :text

      # Reads and checks a pipeline file. Raises DefinitionError (Errno for an unreadable file).
      def self.load(path, **opts)
        parse(File.read(path), file: path, **opts)
      end

      # Checks a pipeline given as text; file: names it in messages; check_commands:
      # false skips looking the commands up (a file checked for another machine).
      def self.parse(text, file: "(string)", check_commands: true, env: ENV)
        Loader.new(text, file, check_commands, env).load
      end

      # @api private (Loader builds it)
      def initialize(file:, name:, components:, dead_letter:, shutdown_grace:, heartbeat_interval:, queue_size:,
                     ready_timeout:, warnings:, text:, wiring: "runner")
        @file = file
        @name = name
        @components = components.freeze
        @by_id = components.to_h { |c| [c.id, c] }.freeze
        @dead_letter = dead_letter
        @shutdown_grace = shutdown_grace
        @heartbeat_interval = heartbeat_interval
        @queue_size = queue_size
        @ready_timeout = ready_timeout
        @wiring = wiring
        @warnings = warnings.freeze
        @text = text
        freeze
      end

      def [](id) = @by_id[id]

      # Do the components wire themselves (wiring: discovery)?
      def self_wired? = wiring == "discovery"
      def sources = components.select(&:source?)
      def processors = components.select(&:processor?)
      def sinks = components.select(&:sink?)

      # The ids a component reads from.
      def upstream(id) = @by_id.fetch(id).inputs

      # The ids that read from a component.
      def downstream(id) = components.select { |c| c.inputs.include?(id) }.map(&:id)

      def to_h
        { "name" => name, "file" => file, "dead_letter" => dead_letter,
          "components" => components.map { |c| { "id" => c.id, "role" => c.role.to_s, "inputs" => c.inputs } } }
      end
    end
  end
end

require_relative "definition_loader"
