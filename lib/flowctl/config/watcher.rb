# frozen_string_literal: true

require_relative "schema"

module Flowctl
  module Config
    # Client of flowctl.ext.v1.ConfigService (the gem's extension), for operators and tools:
    #
    #   cfg = Flowctl::Config.client("127.0.0.1:8080")
    #   cfg.update_config(component_id: "square", values: {"factor" => "3"}, merge: true)
    #   cfg.rollback_config(component_id: "square", version: 1)
    def self.client(endpoint, **opts)
      @client_class ||= Class.new(Flowctl::Client) { use_service Flowctl::Ext::V1::ConfigService }
      @client_class.new(endpoint, **{ tls: false }.merge(opts))
    end

    # The component's side of live configuration: declares its schema, watches its
    # configuration (WatchConfig) from a thread, applies each new version through on_config
    # and reports the version applied (on_applied; a Flowctl::Component puts it in its
    # heartbeat metrics as "config_version", which is how the control plane learns it).
    # A version whose on_config raised is refused (on_refused gets it and the error; without
    # on_refused, on_error does) and never tried again, also after a reconnect.
    # Reconnects with backoff when the control plane goes away; a control plane that lost
    # its versions (restarted without its file) is watched from its first version again; a
    # plain flowctl.v1 control plane (no ConfigService: UNIMPLEMENTED) stops the watcher quietly.
    #
    #   watcher = Flowctl::Config::Watcher.start(endpoint: ENV["FLOWCTL_ENDPOINT"], component_id: id,
    #                                            schema: {"factor" => {type: :integer, min: 1, default: 2}},
    #                                            on_config: ->(values, version) { @factor = values["factor"] },
    #                                            on_applied: ->(version) { metrics.set("config_version", version) })
    #   watcher.version   # the last version applied (0: none)
    #   watcher.stop
    class Watcher
      ACK_KEY = Service::ACK_KEY

      attr_reader :version, :values, :last_error, :refused_version
      # ConfigVersions received from the control plane (applied, refused or skipped).
      attr_reader :received

      def self.start(**opts) = new(**opts).start

      # schema: a Schema, the Hash Schema.new takes, or a callable returning a Schema (asked
      # at each declaration; nil: declare none); on_refused: callable(version, Exception) for
      # a version on_config raised on; on_error: callable(Exception) for failures (the
      # watcher goes on).
      def initialize(endpoint:, component_id:, on_config:, schema: nil, on_applied: nil, on_refused: nil, on_error: nil,
                     client: {})
        @endpoint = endpoint
        @id = component_id
        @schema = schema.is_a?(Hash) ? Schema.new(schema) : schema
        @on_config = on_config
        @on_applied = on_applied
        @on_refused = on_refused
        @on_error = on_error
        @client_opts = client
        @version = 0
        @refused_version = nil
        @received = 0
        @values = {}
        @stopping = false
        @lock = Mutex.new
      end

      def start
        @thread = Thread.new do
          Thread.current.name = "flowctl-config #{@id}"
          Thread.current.report_on_exception = false
          run
        end
        self
      end

      def stop
        @stopping = true
        @lock.synchronize { @call&.cancel }
        @thread&.join(2)
        @client&.close
        self
      end

      private

      def run
        @client = Config.client(@endpoint, **@client_opts)
        backoff = 0.1
        until @stopping
          begin
            declare
            watch
            backoff = 0.1
            sleep backoff unless @stopping # the control plane ended the stream (it stops): not again at once
          rescue Flowctl::Unimplemented
            return # a control plane without the extension
          rescue Flowctl::Error, IOError => e
            return if @stopping

            report(e)
            sleep backoff
            backoff = [backoff * 2, 2.0].min
          end
        end
      end

      # Declares the schema; a control plane whose current version is older than the one
      # applied here lost its versions: watch it from its first one again.
      def declare
        return unless @schema

        schema = @schema.respond_to?(:call) ? @schema.call : @schema
        current = @client.declare_schema(component_id: @id, schema: schema.to_proto)
        return unless current.version < [@version, @refused_version.to_i].max

        @after = 0
        @refused_version = nil
      end

      def watch
        call = @client.watch_config_stream(component_id: @id, after_version: @after || @version)
        @after = nil
        @lock.synchronize do
          @call = call
          call.cancel if @stopping
        end
        call.each { |v| apply(v) }
      ensure
        @lock.synchronize { @call = nil }
      end

      def apply(msg)
        @received += 1
        return if msg.version == @refused_version

        values = Config.decode_values(msg.values)
        @on_config.call(values, msg.version)
        @values = values
        @version = msg.version
        @refused_version = nil
        @on_applied&.call(msg.version)
      rescue StandardError => e
        # not applied: the control plane keeps seeing the version before
        @refused_version = msg.version
        @on_refused ? @on_refused.call(msg.version, e) : report(e)
      end

      def report(error)
        @last_error = error
        @on_error&.call(error)
      end
    end
  end
end
